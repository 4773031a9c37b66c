"""clients.json: which sites the federation invited, by the public key each made itself.

The coordinator registers exactly the invited, unrevoked keys (server/coordinator/), so an
invitation or a revocation is a change of this file, replaced atomically after every check passed.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from common.atomic_file import write_json_atomically
from common.certificates.layout import INIT_HINT, CertsLayout, read_certs_file
from common.site_keys import (
    CertificateError,
    check_site_name,
    fingerprint,
    key_pair_bytes,
    load_public_key,
    write_new_key,
)

MANIFEST_FORMAT = 1


def add_client(root: Path, name: str) -> tuple[Path, Path]:
    """Rehearsal on one machine only: make a key pair for one more client here and invite it;
    returns (private key, public key). Real sites make their own (`invite_client`).

    Not safe against two concurrent `add_client` calls on the same directory (the manifest is
    read-modify-write); key files themselves are never overwritten.
    """
    layout = CertsLayout(Path(root))
    check_site_name(name)
    entries = read_manifest(layout)
    _check_new_name(layout, entries, name)
    private_path, public_path = layout.client_private_key(name), layout.client_public_key(name)
    private_pem, public_line = key_pair_bytes(name)
    layout.clients_dir.mkdir(mode=0o700, exist_ok=True)
    write_new_key(private_path, private_pem, 0o600)
    write_new_key(public_path, public_line, 0o644)
    write_manifest(layout, [*entries, manifest_entry(layout, name, datetime.now(UTC))])
    return private_path, public_path


def invite_client(root: Path, name: str, public_key_file: Path) -> tuple[Path, str]:
    """Invite a site by the public key it made itself; returns (stored key, fingerprint).

    The operator never holds the site's private key. Everything is checked before the first
    write; the key is copied to clients/NAME.pub, then the manifest is replaced atomically.
    """
    layout = CertsLayout(Path(root))
    check_site_name(name)
    entries = read_manifest(layout)
    _check_new_name(layout, entries, name)
    _, line = load_public_key(Path(public_key_file))
    print_ = fingerprint(line)
    for entry in entries:
        other = layout.client_public_key(entry["name"])
        if other.is_file() and fingerprint(load_public_key(other)[1]) == print_:
            raise CertificateError(
                f"{public_key_file}: this key is already {entry['name']!r}'s"
                f"{' (revoked)' if entry.get('revoked') else ''}; ask the site for its own key, "
                "made with `confide certs keygen`"
            )
    public_path = layout.client_public_key(name)
    layout.clients_dir.mkdir(mode=0o700, exist_ok=True)
    write_new_key(public_path, line.rstrip(b"\n") + f" confide-{name}\n".encode(), 0o644)
    try:
        write_manifest(layout, [*entries, manifest_entry(layout, name, datetime.now(UTC))])
    except BaseException:
        public_path.unlink(missing_ok=True)
        raise
    return public_path, print_


def revoke_client(root: Path, name: str) -> datetime:
    """Withdraw a site's invitation: the manifest marks it revoked (its public key stays, so the
    coordinator can find and unregister its node, and a site can be told it was revoked)."""
    layout = CertsLayout(Path(root))
    entries = read_manifest(layout)
    entry = next((e for e in entries if e["name"] == name), None)
    if entry is None:
        invited = ", ".join(e["name"] for e in entries if not e.get("revoked")) or "none"
        raise CertificateError(
            f"{layout.manifest}: no site named {name!r} is invited (invited: {invited}); check "
            "the name with `confide certs show`"
        )
    if entry.get("revoked"):
        raise CertificateError(
            f"{layout.manifest}: {name!r} was already revoked on {entry['revoked']}; nothing to do"
        )
    now = datetime.now(UTC)
    revoked = {**entry, "revoked": now.isoformat(timespec="seconds")}
    write_manifest(layout, [revoked if e is entry else e for e in entries])
    return now


def revoked_clients(root: Path) -> dict[str, Path]:
    """Revoked site name -> its (former) public key file, where it still exists."""
    layout = CertsLayout(Path(root))
    return {
        entry["name"]: layout.client_public_key(entry["name"])
        for entry in read_manifest(layout)
        if entry.get("revoked") and layout.client_public_key(entry["name"]).is_file()
    }


def client_public_keys(root: Path) -> dict[str, Path]:
    """Invited (not revoked) client name -> OpenSSH public key file, in invitation order."""
    layout = CertsLayout(Path(root))
    keys: dict[str, Path] = {}
    for entry in read_manifest(layout):
        if entry.get("revoked"):
            continue
        path = layout.client_public_key(entry["name"])
        if not path.is_file():
            raise CertificateError(
                f"{path}: public key of invited client {entry['name']!r} is missing; restore it "
                "from a backup or re-invite the client under a new name"
            )
        keys[entry["name"]] = path
    return keys


def _check_new_name(layout: CertsLayout, entries: list[dict[str, str]], name: str) -> None:
    existing = next((e for e in entries if e["name"] == name), None)
    if existing is not None:
        state = f"was revoked on {existing['revoked']}" if existing.get("revoked") else (
            "is already invited")  # fmt: skip
        raise CertificateError(
            f"{layout.manifest}: site {name!r} {state}; invite this key under another name"
        )
    for path in (layout.client_private_key(name), layout.client_public_key(name)):
        if path.exists():
            raise CertificateError(
                f"{path}: leftover key file for uninvited site {name!r}; delete it or pick "
                "another name"
            )


def manifest_entry(layout: CertsLayout, name: str, added: datetime) -> dict[str, str]:
    """One invited site as clients.json records it."""
    return {
        "name": name,
        "public_key": layout.client_public_key(name).relative_to(layout.root).as_posix(),
        "added": added.isoformat(timespec="seconds"),
    }


def write_manifest(layout: CertsLayout, entries: list[dict[str, str]]) -> None:
    """Replace clients.json in one step: the coordinator may be reading it right now."""
    write_json_atomically(layout.manifest, {"format": MANIFEST_FORMAT, "clients": entries})


def read_manifest(layout: CertsLayout) -> list[dict[str, str]]:
    """Every entry of clients.json, revoked ones included, in invitation order."""
    if not layout.manifest.is_file():
        raise CertificateError(
            f"{layout.manifest}: not found, so {layout.root} is not an initialised certificates "
            f"directory; pass the right directory or {INIT_HINT}"
        )
    data = read_certs_file(layout.manifest, "client manifest")
    try:
        doc = json.loads(data)
        entries = doc["clients"]
        if doc.get("format") != MANIFEST_FORMAT or not isinstance(entries, list):
            raise ValueError
        for entry in entries:
            check_site_name(entry["name"])
    except (ValueError, KeyError, TypeError, CertificateError):
        raise CertificateError(
            f"{layout.manifest}: corrupt client manifest; restore it from a backup"
        ) from None
    return entries
