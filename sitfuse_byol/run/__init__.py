"""Run: the whole pipeline over a scene list, locally or on a Dask cluster, resumable."""
