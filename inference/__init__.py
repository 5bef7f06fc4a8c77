"""Using trained models on your own videos: the Python API (inference.api), a searchable
index of a video folder (inference.index) and the `video_tool.py` command line."""
