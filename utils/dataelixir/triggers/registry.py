"""The registry of backdoor triggers: attack name -> Trigger class, one module per attack."""

from __future__ import annotations

from utils.dataelixir.triggers import badnet, blended, ftrojan, inputaware, lc, lf, sig, ssba, wanet
from utils.dataelixir.triggers.base import Trigger
from utils.fileio import UserError

# in the papers' table order
TRIGGERS: dict[str, type[Trigger]] = {
    m.TRIGGER.name: m.TRIGGER for m in (badnet, blended, sig, lc, lf, ssba, inputaware, wanet, ftrojan)
}


def get_trigger(name: str) -> type[Trigger]:
    if name not in TRIGGERS:
        raise UserError(f"unknown attack {name!r}; choose from {', '.join(TRIGGERS)}")
    return TRIGGERS[name]
