"""Training: the run loop on the transformers Trainer (`train`), the data it reads (`data`) and its console and metrics (`monitor`)."""
