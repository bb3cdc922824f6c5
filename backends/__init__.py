"""prunec's backends (installed as ``prunec.backends``): torch and TVM."""
