"""The `[openadr]` table: the site's OpenADR 2.0b VEN (`mineops ven`), beside its driver."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator

from controller.config_types import StrictModel


class OpenAdrConfig(StrictModel):
    """The site's OpenADR 2.0b VEN (`mineops ven`): the VTN to poll and how its events map to kW."""

    vtn_url: str = Field(
        pattern=r"^https?://[^\s/]+(/\S*)?$", max_length=512,
        description="The VTN's OpenADR endpoint, e.g. https://vtn.example.com/OpenADR2/Simple/2.0b",
    )
    ven_name: str = Field(min_length=1, max_length=128,
                          description="This VEN's name, as registered with the utility")
    ven_id: str | None = Field(
        default=None, min_length=1, max_length=128,
        description="This VEN's id if the utility assigned one (default: the VTN assigns it)",
    )
    poll_interval_s: float | None = Field(
        default=None, ge=1, le=86_400,
        description="Poll the VTN this often, s (default: as often as the VTN asks)",
    )
    report_interval_s: float = Field(
        default=60.0, ge=1, le=3600,
        description="Shortest site-power report interval offered to the VTN, s",
    )
    report_stale_s: float = Field(
        default=60.0, gt=0, description="Meter readings older than this are not reported, s"
    )
    level_1_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 1 (moderate), kW; unset: level 1 not honoured",
    )
    level_2_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 2 (high), kW; unset: level 2 not honoured",
    )
    level_3_kw: float | None = Field(
        default=None, ge=0, le=10_000_000,
        description="Site target for SIMPLE level 3 (special), kW; unset: level 3 not honoured",
    )
    opt_in: Literal["when_mapped", "always", "never"] = Field(
        default="when_mapped",
        description="when_mapped: opt in when every interval maps to a target the site can hold; "
        "always: opt in and forward what maps; never: opt out, forward nothing",
    )
    min_target_kw: float = Field(
        default=0.0, ge=0, le=10_000_000,
        description="Lowest site power the site can hold (never-curtail miners, cooling), kW; "
        "a lower target is not honoured under when_mapped",
    )
    deadline_from_ramp_up: bool = Field(
        # OpenADR's ramp-up is time *before* the start: the safe reading for the grid is to
        # be at the target by the start, so the lenient one is opt-in.
        default=False,
        description="Deadline = start + the event's ramp-up period (x-eiRampUp); false: the start",
    )
    republish_s: float = Field(
        default=60.0, ge=1, le=3600,
        description="Re-publish open events this often, s (a controller started later gets them)",
    )
    cert_file: Path | None = Field(default=None, description="VEN client certificate (PEM)")
    key_file: Path | None = Field(default=None, description="VEN private key (PEM)")
    key_passphrase: SecretStr | None = Field(default=None, description="Private key passphrase")
    ca_file: Path | None = Field(default=None, description="CA bundle the VTN's certificate "
                                 "is checked against")
    vtn_fingerprint: str | None = Field(
        default=None, max_length=128,
        description="The VTN certificate's fingerprint; messages are signature-checked when set",
    )

    @model_validator(mode="after")
    def _check(self) -> OpenAdrConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        levels = [x for x in (self.level_1_kw, self.level_2_kw, self.level_3_kw) if x is not None]
        if levels != sorted(levels, reverse=True):
            raise ValueError("a higher SIMPLE level must not have a higher target (level_N_kw)")
        return self
