"""The coordinator's command line (``coordinator``) and its Flower ServerApp."""
