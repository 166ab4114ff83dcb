"""Input to token ids: the documents a user names, their chunks, the prompt layouts, BM25."""
