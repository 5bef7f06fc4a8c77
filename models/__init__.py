"""TESTA's video-language models: the TimeSformer video encoder with token aggregation
(timesformer.py, merge.py), the BERT text encoder/decoder (med.py) and the task models
(testa_retrieval.py, testa_vqa.py, blip_pretrain.py). Build them through the front door:

    from models import create_model_and_transforms
    model, preprocess = create_model_and_transforms("configs/toy/retrieval.yaml", checkpoint="ckpt.pth")
"""
from models.factory import TASKS, create_model, create_model_and_transforms

__all__ = ["TASKS", "create_model", "create_model_and_transforms"]
