"""GET /v1/models: the one model this server serves."""

from __future__ import annotations

import time

from router.openai.responses import ModelCard, ModelList
from router.openai.served_model import ServedModel


class Models:
    def __init__(self, model: ServedModel):
        self.model = model
        self.created = int(time.time())  # when serving began: the model has no other birth date here

    def model_list(self) -> ModelList:
        card = ModelCard(
            id=self.model.model_name, created=self.created, max_model_len=self.model.frontend.max_model_len
        )
        return ModelList(data=[card])
