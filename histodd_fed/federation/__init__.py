"""Federation: centre and coordinator logic for cross-centre transfer through Flower.

Everything here is plain Python and never imports ``flwr`` except :mod:`flower_records`, the one
adapter between Flower records and this package's :class:`~histodd_fed.federation.envelope.Envelope`.
"""
