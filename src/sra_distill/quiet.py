"""Library output a user cannot act on, silenced for a run or an evaluation: progress bars when asked
(`progress=false`, `--no-progress`), and accelerate's note on tied weights at every save."""

from __future__ import annotations

import logging

import huggingface_hub.utils
import transformers.utils.logging


class _TiedWeightsFilter(logging.Filter):
    """accelerate warns at every save that it left out a shared tensor ("Removed shared tensor {'lm_head.weight'}
    while saving ... check ..."): students tie their output head to the embeddings, so this is expected, and the
    weight is tied again on load."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Removed shared tensor" not in record.getMessage()


_TIED_WEIGHTS_FILTER = _TiedWeightsFilter()  # one instance: addFilter ignores a filter already added


def quiet_libraries(progress: bool) -> None:
    """Drop accelerate's tied-weights note; with `progress=False` also every transformers and huggingface_hub bar
    (transformers' "Writing model shards" at each save). Bars are only ever turned off, never back on, so a caller
    who disabled them stays quiet."""
    logging.getLogger("accelerate.utils.other").addFilter(_TIED_WEIGHTS_FILTER)
    if not progress:
        transformers.utils.logging.disable_progress_bar()
        huggingface_hub.utils.disable_progress_bars()
