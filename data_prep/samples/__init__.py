"""Small, real, offline sample corpora for demos and tests."""
