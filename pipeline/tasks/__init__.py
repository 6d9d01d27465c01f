"""The paper's downstream tasks on the shared Trainer: their metrics (`metrics`), data access and
evaluation (`ve`); each task's stages live in pipeline/stages/."""
