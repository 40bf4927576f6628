"""Whole-slide images: a procedural demo-slide generator and slide ingestion (tiling).

- :mod:`histodd_fed.slides.stains`      Beer-Lambert H&E stain model and centre presets
- :mod:`histodd_fed.slides.demo`        procedural H&E demo slides, pyramidal TIFFs, annotations
- :mod:`histodd_fed.slides.pyramid`     writing pyramidal tiled TIFFs that OpenSlide reads
- :mod:`histodd_fed.slides.annotations` tumour polygons in ASAP XML and QuPath GeoJSON
- :mod:`histodd_fed.slides.manifest`    the ``slides.csv`` manifest and train/test selection
- :mod:`histodd_fed.slides.reader`      opening slides with OpenSlide; MPP and level selection
- :mod:`histodd_fed.slides.tissue`      Otsu tissue masks
- :mod:`histodd_fed.slides.one_slide`   one slide -> its patches, labels and thumbnail
- :mod:`histodd_fed.slides.tiling`      slides -> one :class:`~histodd_fed.patchset.PatchSet`
  (the batch: inputs, resumable shards, worker processes)

Import the submodules directly; this package imports nothing heavy.
"""
