"""The paper's downstream-task models, built from the same encoders as pretraining and retrieval
(model/albef.py): SNLI-VE (`ve`), NLVR2 + its text-assignment pretraining (`nlvr`), VQA (`vqa`), weakly
supervised grounding (`grounding`, on the retrieval model); task checkpoint converters (`convert`)."""

from model.heads.nlvr import ALBEFNLVR, ALBEFTextAssignment, TAConfig, build_nlvr, build_text_assignment
from model.heads.ve import ALBEFVE, ClassifierConfig, build_ve
from model.heads.vqa import ALBEFVQA, VQAConfig, build_vqa

__all__ = [
    "ALBEFVE",
    "ClassifierConfig",
    "build_ve",
    "ALBEFNLVR",
    "ALBEFTextAssignment",
    "TAConfig",
    "build_nlvr",
    "build_text_assignment",
    "ALBEFVQA",
    "VQAConfig",
    "build_vqa",
]
