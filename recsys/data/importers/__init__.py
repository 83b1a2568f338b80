"""Importers: each source of data (your own files, MovieLens, MicroLens, the synthetic corpus) read onto
the canonical tables of `recsys.data.schema`; everything after `recsys data prepare` reads only those.

A new source is one more module here, never a new branch in a later stage.
"""
