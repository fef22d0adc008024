"""data-prep: turn image corpora into webdataset tar shards with a manifest (see `data-prep --help`)."""

__version__ = "0.1.0"
