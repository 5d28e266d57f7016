"""The data path: download a raw corpus, tokenize it into Cerebras-layout HDF5, verify it, load it."""

# The rows of each HDF5 sample ``data[i]``, in order: what the reference's data_params.json "features"
# names and its readers map them by.
FEATURES = ("input_ids", "attention_mask", "labels")
DATA_PARAMS = "data_params.json"  # beside the .h5 files of a split: how they were made (both generations)
