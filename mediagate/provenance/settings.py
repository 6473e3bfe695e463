"""Whether and with what outputs are signed: plain data, part of the application's
arguments."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

SigningAlgorithm = Literal["es256", "es384", "es512", "ps256", "ps384", "ps512", "ed25519"]


class ProvenanceSettings(BaseModel):
    """C2PA signing of every image and video returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="Sign outputs (false: no manifest is added).")
    certificate_chain: str | None = Field(
        None,
        description="PEM file: the signing certificate, then its issuers. Unset: a local "
        "test certificate under MEDIAGATE_HOME/secrets (made once; readers call it "
        "untrusted).",
    )
    private_key: str | None = Field(None, description="PEM file: the certificate's key.")
    algorithm: SigningAlgorithm = Field("es256", description="Matches the key's type.")
    timestamp_url: str | None = Field(
        None, description="An RFC 3161 time-stamp authority to counter-sign (none offline)."
    )
    include_prompt: bool = Field(
        False, description="Put the prompt in the manifest (off: prompts stay private)."
    )
