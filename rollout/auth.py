"""Identities and roles. Every approval, promotion and rollback carries an Identity; the role is
re-checked on the server side of every action (rollout.approvals), never only in a UI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Role = Literal["viewer", "approver"]
ROLES: tuple[Role, ...] = ("viewer", "approver")


class PermissionDenied(PermissionError):
    pass


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role
    source: str  # "cli-env", "local-account", "oidc", "flow"

    @property
    def can_approve(self) -> bool:
        return self.role == "approver"


def require_approver(identity: Identity | None, action: str) -> Identity:
    if identity is None:
        raise PermissionDenied(f"{action} needs a signed-in approver; nobody is signed in")
    if not identity.can_approve:
        raise PermissionDenied(f"{action} needs the approver role; {identity.name!r} is a {identity.role}")
    return identity
