"""GET /v1/models and /v1/models/{id}: the one model this server serves."""

from __future__ import annotations

import time

from folio.router.openai.responses import ModelCard, ModelList
from folio.router.openai.served_model import ServedModel


class Models:
    def __init__(self, model: ServedModel):
        self.model = model
        self.created = int(time.time())  # when serving began: the model has no other birth date here

    def card(self) -> ModelCard:
        return ModelCard(
            id=self.model.model_name, created=self.created, max_model_len=self.model.frontend.max_model_len
        )

    def model_list(self) -> ModelList:
        return ModelList(data=[self.card()])

    def retrieve(self, model_id: str) -> ModelCard:
        """`client.models.retrieve(id)`: the card, or a 404 for any other id."""
        self.model.check_model(model_id)
        return self.card()
