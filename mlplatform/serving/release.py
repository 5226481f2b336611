"""Which model of the release answers a request: sticky, hash-based canary assignment.

In ``canary`` the challenger answers a share of the requests. The share is assigned by a hash of
a request key (the ``X-Request-Key`` header a client sets, such as a user or session id, else the
request id), so one client sees one model, and raising the share only adds keys: a key answered
by the challenger at 10% is still answered by it at 20%. Nothing here imports Ray.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

REQUEST_KEY_HEADER = "X-Request-Key"
"""The header naming the key a request is assigned by (a user, a session); else the request id."""

_HASH_SPACE = 2**64


def answered_by_challenger(key: str, share: float) -> bool:
    """Whether the challenger answers a request with this key when it answers ``share`` of them.

    The key's BLAKE2b hash, read as a number in [0, 1), is compared with the share: uniform over
    keys, the same for a key on every replica and every run.

    Raises:
        ValueError: if ``share`` is not within [0, 1].

    """
    if not 0 <= share <= 1:
        raise ValueError(f"the challenger's share must be within [0, 1], got {share}")
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _HASH_SPACE < share


class Release(BaseModel):
    """What one deployment serves: the champion and, during a rollout, a challenger and its stage.

    It is the deployment's ``user_config``: a change of stage or share reaches every replica
    through Ray Serve's ``reconfigure``, with no restart and no model reload (both models are
    loaded in every replica from the start of the rollout).

    Attributes:
        champion: the champion's model version; it answers every request not in the canary.
        challenger: the challenger's version, or ``None`` when no rollout is under way.
        stage: ``shadow`` (the challenger scores every request beside the champion, off the
            answer's path) or ``canary`` (it answers ``canary_share`` of the requests).
        canary_share: the share of request keys the challenger answers in ``canary``.

    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    champion: str
    challenger: str | None = None
    stage: Literal["shadow", "canary"] | None = None
    canary_share: float = Field(default=0.0, ge=0, le=1)
    rollout_id: str | None = Field(
        default=None, description="Names the rollout's evidence on disk (one per challenger)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Release:
        if not (self.challenger is None) == (self.stage is None) == (self.rollout_id is None):
            raise ValueError("a challenger, its stage and its rollout id go together")
        if self.challenger == self.champion:
            raise ValueError(f"v{self.champion} cannot be its own challenger")
        if self.stage == "canary" and not 0 < self.canary_share < 1:
            raise ValueError(f"a canary's share must be between 0 and 1, got {self.canary_share}")
        return self

    def answering_version(self, key: str) -> str:
        """The version that answers a request with this key."""
        if self.stage == "canary" and answered_by_challenger(key, self.canary_share):
            return str(self.challenger)
        return self.champion

    @property
    def versions(self) -> tuple[str, ...]:
        """The model versions this release needs loaded: the champion, then any challenger."""
        return (self.champion,) if self.challenger is None else (self.champion, self.challenger)

    @property
    def rollout_label(self) -> str | None:
        """The challenger in a phrase (``v4 in shadow``, ``v4 in canary at 20%``); else ``None``."""
        if self.challenger is None:
            return None
        if self.stage == "canary":
            return f"v{self.challenger} in canary at {self.canary_share:.0%}"
        return f"v{self.challenger} in shadow"

    @property
    def shadowed(self) -> bool:
        """Whether the challenger scores every request beside the champion."""
        return self.stage == "shadow"


def key_answered_by(release: Release, version: str, prefix: str = "check") -> str:
    """A request key this release assigns to ``version`` (for a smoke test of each version).

    Raises:
        ValueError: if ``version`` answers no request in this release.

    """
    if version not in {release.champion, release.challenger if release.stage == "canary" else None}:
        raise ValueError(f"v{version} answers no request in {release}")
    return next(
        key
        for key in (f"{prefix}-{n}" for n in itertools.count())
        if release.answering_version(key) == version
    )


ROLLOUT_STATE_TAG = "mlplatform.rollout"
"""The registered model's tag holding the rollout under way (:class:`RolloutState`, as JSON)."""


class RolloutState(BaseModel):
    """A rollout under way, as the registry keeps it beside the `champion` alias.

    The registry is what the endpoint converges to: the champion alias plus this state give
    the :class:`Release` to serve.

    Attributes:
        challenger: the version being rolled out.
        stage: ``shadow`` or ``canary``.
        canary_share: the share of request keys the challenger answers in ``canary``.
        rollout_id: names this rollout's evidence on disk.
        started_at: when the rollout began (unix seconds).
        stage_since: when the current stage began (unix seconds).
        paused: the rollout sensor leaves a paused rollout where it is.

    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    challenger: str
    stage: Literal["shadow", "canary"]
    canary_share: float = Field(ge=0, le=1)
    rollout_id: str
    started_at: float
    stage_since: float
    paused: bool = False

    @classmethod
    def begin(cls, challenger: str, canary_share: float, now: float | None = None) -> RolloutState:
        """A new rollout of ``challenger``, in shadow."""
        now = time.time() if now is None else now
        return cls(
            challenger=str(challenger),
            stage="shadow",
            canary_share=canary_share,
            rollout_id=f"v{challenger}-{int(now)}",
            started_at=now,
            stage_since=now,
        )

    def release(self, champion: str) -> Release:
        """The release to serve with this rollout beside ``champion``."""
        return Release(
            champion=str(champion),
            challenger=self.challenger,
            stage=self.stage,
            canary_share=self.canary_share,
            rollout_id=self.rollout_id,
        )
