"""cellseg in napari: the "Segment nuclei" dock widget, a reader and sample data.

``pip install -e ".[napari]"``, then ``napari`` and Plugins > cellseg. The manifest is
``napari.yaml``; :mod:`cellseg.napari.actions` holds what the widget does, without Qt (the same
functions as ``python -m cellseg.predict``, so the widget's labels equal predict's). Qt and
napari are imported only by ``widget`` (and the reader's layer building), never by the core.
"""
