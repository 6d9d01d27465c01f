"""The paper's downstream-task models (SNLI-VE, NLVR2 + text assignment, VQA, weakly supervised
grounding), built from the same encoders as pretraining and retrieval (model/albef.py)."""
