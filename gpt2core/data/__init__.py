"""The data path: download a raw corpus, tokenize it into Cerebras-layout HDF5, verify it, load it."""
