"""Read /metrics as Prometheus does (prometheus_client's parser), not as text."""

from __future__ import annotations

from typing import Optional

from prometheus_client.parser import text_string_to_metric_families


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample: (name, its labels as a frozenset of items) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(text: str, name: str, **labels: str) -> Optional[float]:
    """One sample's value, None when absent."""
    return samples(text).get((name, frozenset(labels.items())))
