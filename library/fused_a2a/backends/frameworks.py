"""The names other tools give a backend's knobs: the variables they read, the settings of the training
frameworks that set them, SGLang's config keywords (what ``a2a-bench export`` writes and ``a2a-bench show
--framework`` lists). A backend declares its own in its :class:`~fused_a2a.backends.base.BackendSpec`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class SGLangConfig:
    """How SGLang's ``--deepep-config`` JSON holds a backend's knobs.

    Attributes:
        kwargs: ``(our knob, its keyword in the backend library's Config(...))`` pairs, in output order.
        configs: ``(dispatch knobs, combine knobs, num_ranks) -> (dispatch Config, combine Config)``, full
            knob dicts to the library's config objects (a chunk knob of ``0``: the library's default for
            ``num_ranks``); ``ValueError`` for knobs the library rejects on ``num_ranks`` ranks.
    """

    kwargs: tuple[tuple[str, str], ...]
    configs: Callable[[dict[str, Any], dict[str, Any], int], tuple[Any, Any]]

    def sections(self, dispatch: dict[str, Any], combine: dict[str, Any], num_ranks: int) -> dict[str, dict[str, Any]]:
        """``{"normal_dispatch": {Config keyword: value}, "normal_combine": {...}}`` for two full knob dicts.

        Raises:
            ValueError: knobs the library rejects on ``num_ranks`` ranks.
        """
        d, c = self.configs(dispatch, combine, num_ranks)
        return {"normal_dispatch": {kwarg: getattr(d, knob) for knob, kwarg in self.kwargs},
                "normal_combine": {kwarg: getattr(c, knob) for knob, kwarg in self.kwargs}}


@dataclass(frozen=True)
class ForeignNames:
    """The names other tools give one backend's knobs.

    Attributes:
        env: ``(knob, variable)``: the environment variable another tool (the backend library, NeMo)
            reads the knob from.
        megatron: ``(knob, field)``: the Megatron-LM ``TransformerConfig`` field that sets the knob.
        automodel_sms: the knob NeMo Automodel's ``BackendConfig.dispatcher_num_sms`` sets (``None``: none).
        automodel: ``(knob, field)``: the other NeMo Automodel ``BackendConfig`` fields that set knobs.
        combine_sms: the knob of the combine's own SM count, where the backend has one apart from the
            dispatch's (the frameworks set one count for both).
        frameworks: the ``fused_a2a.compat`` drop-in modules (``automodel``, ``megatron``) whose calls reach
            this backend.
        sglang: how SGLang's ``--deepep-config`` holds the knobs (``None``: SGLang takes no config of it).
    """

    env: tuple[tuple[str, str], ...] = ()
    megatron: tuple[tuple[str, str], ...] = ()
    automodel_sms: str | None = None
    automodel: tuple[tuple[str, str], ...] = ()
    combine_sms: str | None = None
    frameworks: tuple[str, ...] = ()
    sglang: SGLangConfig | None = None
