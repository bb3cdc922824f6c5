"""prunec's built-in passes, one module per pass (installed as ``prunec.passes``)."""
