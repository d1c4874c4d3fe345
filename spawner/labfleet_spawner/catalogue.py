"""The hardware and profile catalogue: one YAML file, validated, as plain data.

Everything here is pure: :func:`parse_catalogue` turns already-loaded data into
frozen dataclasses, :func:`load_catalogue` adds the file read. Errors are
:class:`CatalogueError` and always name the file, the entry and the field, so
an admin can fix a typo without reading a traceback.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import yaml

_QUANTITY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_UNITS = {
    None: 1,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


class CatalogueError(ValueError):
    """The catalogue file is invalid; the message names file, entry and field."""


def parse_quantity(value: str) -> int:
    """Bytes in a Kubernetes-style quantity such as ``16Gi`` or ``500M``."""
    match = _QUANTITY_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a quantity like 512Mi, 4Gi or 1T")
    number, unit = match.groups()
    return int(float(number) * _UNITS[unit])


@dataclass(frozen=True)
class Image:
    name: str
    image: str
    display_name: str = ""
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Size:
    name: str
    cpu: float
    memory: str
    display_name: str = ""
    shm: str | None = None

    @property
    def memory_bytes(self) -> int:
        return parse_quantity(self.memory)

    @property
    def shm_bytes(self) -> int | None:
        return parse_quantity(self.shm) if self.shm else None


@dataclass(frozen=True)
class Accelerator:
    name: str
    kind: str  # "gpu", "mig" or "fpga"
    resource: str
    display_name: str = ""
    node_labels: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict, ...] = ()
    nvml_models: tuple[str, ...] = ()
    mig_profile: str | None = None
    gpu_fraction: float = 1.0
    max_count: int = 1
    groups: tuple[str, ...] = ()

    def __hash__(self):  # node_labels is a dict; names are unique in a catalogue
        return hash((self.name, self.resource))


@dataclass(frozen=True)
class Profile:
    name: str
    images: tuple[str, ...]
    sizes: tuple[str, ...]
    display_name: str = ""
    description: str = ""
    accelerator: str | None = None
    groups: tuple[str, ...] = ()
    default: bool = False
    kueue: bool = False
    allow_accelerator_nodes: bool = False


@dataclass(frozen=True)
class Catalogue:
    images: dict[str, Image]
    sizes: dict[str, Size]
    accelerators: dict[str, Accelerator]
    profiles: dict[str, Profile]
    source: str = "<catalogue>"

    def accelerator_of(self, profile: Profile) -> Accelerator | None:
        return self.accelerators[profile.accelerator] if profile.accelerator else None


def _allowed(required: tuple[str, ...], groups: frozenset[str]) -> bool:
    """An empty ``groups`` list in the catalogue means: every hub user."""
    return not required or bool(groups.intersection(required))


@dataclass(frozen=True)
class ProfileChoice:
    """One profile as offered to one user: only the options their groups allow."""

    profile: Profile
    images: tuple[Image, ...]
    sizes: tuple[Size, ...]
    accelerator: Accelerator | None

    @property
    def max_count(self) -> int:
        return self.accelerator.max_count if self.accelerator else 0


def offered_profiles(catalogue: Catalogue, groups) -> list[ProfileChoice]:
    """What a user in ``groups`` may choose, in catalogue order.

    A profile is offered when the profile, its accelerator and at least one of
    its images are allowed to one of the user's groups.
    """
    groups = frozenset(groups)
    offered = []
    for profile in catalogue.profiles.values():
        if not _allowed(profile.groups, groups):
            continue
        accelerator = catalogue.accelerator_of(profile)
        if accelerator and not _allowed(accelerator.groups, groups):
            continue
        images = tuple(
            catalogue.images[i]
            for i in profile.images
            if _allowed(catalogue.images[i].groups, groups)
        )
        if not images:
            continue
        sizes = tuple(catalogue.sizes[s] for s in profile.sizes)
        offered.append(ProfileChoice(profile, images, sizes, accelerator))
    return offered


@dataclass(frozen=True)
class Selection:
    """A validated choice: everything a spawner needs, nothing a user typed."""

    profile: Profile
    image: Image
    size: Size
    accelerator: Accelerator | None
    count: int

    def as_user_options(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "image": self.image.name,
            "size": self.size.name,
            "count": self.count,
        }


class SelectionError(ValueError):
    """A spawn request asked for something not offered to this user."""


def _names(items) -> str:
    return ", ".join(sorted(i.name for i in items)) or "(none)"


def validate_selection(catalogue: Catalogue, groups, options: dict[str, Any]) -> Selection:
    """Check raw user options against what the catalogue offers ``groups``.

    ``options`` holds ``profile``, ``image``, ``size`` and ``count`` as sent by
    the form or the REST API; anything missing takes the profile's first
    offered value. Raises :class:`SelectionError` naming the bad field and the
    allowed values.
    """
    if not isinstance(options, dict):
        raise SelectionError("user options must be an object with profile, image, size, count")
    unknown = set(options) - {"profile", "image", "size", "count"}
    if unknown:
        raise SelectionError(
            f"unknown option(s) {', '.join(sorted(map(str, unknown)))}; "
            "allowed: profile, image, size, count"
        )
    offered = offered_profiles(catalogue, groups)
    if not offered:
        raise SelectionError("no profile in the catalogue is available to your groups")
    by_name = {c.profile.name: c for c in offered}
    default = next((c for c in offered if c.profile.default), offered[0])
    profile_name = options.get("profile") or default.profile.name
    choice = by_name.get(str(profile_name))
    if choice is None:
        raise SelectionError(
            f"profile {str(profile_name)[:64]!r} is not available to you; "
            f"allowed: {_names(c.profile for c in offered)}"
        )

    def pick(field_name, items):
        wanted = options.get(field_name) or items[0].name
        for item in items:
            if item.name == wanted:
                return item
        raise SelectionError(
            f"{field_name} {str(wanted)[:64]!r} is not offered with profile "
            f"{choice.profile.name!r}; allowed: {_names(items)}"
        )

    image = pick("image", choice.images)
    size = pick("size", choice.sizes)
    raw_count = options.get("count")
    if choice.accelerator is None:
        if raw_count not in (None, "", 0, "0"):
            raise SelectionError(
                f"profile {choice.profile.name!r} has no accelerator; count must be 0 or absent"
            )
        count = 0
    else:
        try:
            if isinstance(raw_count, bool):
                raise TypeError
            count = int(raw_count) if raw_count not in (None, "") else 1
            if isinstance(raw_count, float) and raw_count != count:
                raise ValueError
        except (TypeError, ValueError, OverflowError):  # Infinity is a float JSON accepts
            raise SelectionError(
                f"count {str(raw_count)[:32]!r} is not a whole number; "
                f"allowed: 1 to {choice.max_count}"
            ) from None
        if not 1 <= count <= choice.max_count:
            raise SelectionError(
                f"count {count} of {choice.accelerator.name} is out of range; "
                f"allowed: 1 to {choice.max_count}"
            )
    return Selection(choice.profile, image, size, choice.accelerator, count)


# -- loading ----------------------------------------------------------------


@cache
def catalogue_schema() -> dict:
    text = resources.files(__package__).joinpath("catalogue.schema.json").read_text()
    return json.loads(text)


def _entry_label(data: dict, path) -> tuple[str, list]:
    """``profiles[3] 'gpu-a100'`` for a JSON path into the catalogue."""
    path = list(path)
    if len(path) >= 2 and isinstance(path[1], int):
        section, index = path[0], path[1]
        try:
            name = data[section][index].get("name")
        except (AttributeError, IndexError, KeyError, TypeError):
            name = None
        label = f"{section}[{index}]" + (f" {name!r}" if name else "")
        return label, path[2:]
    return (str(path[0]) if path else "(top level)"), path[1:]


def parse_catalogue(data: Any, source: str = "<catalogue>") -> Catalogue:
    """Validate plain data (as loaded from YAML) and build a :class:`Catalogue`."""
    if not isinstance(data, dict):
        raise CatalogueError(
            f"{source}: the catalogue must be a mapping with images, sizes, profiles"
        )
    validator = jsonschema.Draft202012Validator(catalogue_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
    if errors:
        err = errors[0]
        entry, rest = _entry_label(data, err.absolute_path)
        field_name = ".".join(map(str, rest)) or "(entry)"
        raise CatalogueError(f"{source}: {entry}: field {field_name}: {err.message}")

    def unique(section, items):
        seen = {}
        for index, item in enumerate(items):
            if item["name"] in seen:
                raise CatalogueError(
                    f"{source}: {section}[{index}] {item['name']!r}: field name: "
                    f"duplicate of {section}[{seen[item['name']]}]"
                )
            seen[item["name"]] = index
        return seen

    for section in ("images", "sizes", "accelerators", "profiles"):
        unique(section, data.get(section, []))

    images = {
        i["name"]: Image(
            name=i["name"],
            image=i["image"],
            display_name=i.get("display_name", i["name"]),
            groups=tuple(i.get("groups", ())),
        )
        for i in data["images"]
    }
    sizes = {s["name"]: Size(**{"display_name": s["name"], **s}) for s in data["sizes"]}
    accelerators = {}
    for index, a in enumerate(data.get("accelerators", [])):
        where = f"{source}: accelerators[{index}] {a['name']!r}"
        if a["kind"] == "mig" and "mig_profile" not in a:
            raise CatalogueError(f"{where}: field mig_profile: required for kind mig")
        fraction = a.get("gpu_fraction")
        if fraction is None:
            fraction = _mig_fraction(a["mig_profile"]) if a["kind"] == "mig" else 1.0
        accelerators[a["name"]] = Accelerator(
            name=a["name"],
            kind=a["kind"],
            resource=a["resource"],
            display_name=a.get("display_name", a["name"]),
            node_labels=dict(a.get("node_labels", {})),
            tolerations=tuple(a.get("tolerations", ())),
            nvml_models=tuple(a.get("nvml_models", ())),
            mig_profile=a.get("mig_profile"),
            gpu_fraction=fraction,
            max_count=a.get("max_count", 1),
            groups=tuple(a.get("groups", ())),
        )
    profiles = {}
    for index, p in enumerate(data["profiles"]):
        where = f"{source}: profiles[{index}] {p['name']!r}"
        for field_name, known in (("images", images), ("sizes", sizes)):
            for ref in p[field_name]:
                if ref not in known:
                    raise CatalogueError(
                        f"{where}: field {field_name}: {ref!r} is not defined; "
                        f"defined {field_name}: {', '.join(known)}"
                    )
        if p.get("accelerator") and p["accelerator"] not in accelerators:
            raise CatalogueError(
                f"{where}: field accelerator: {p['accelerator']!r} is not defined; "
                f"defined accelerators: {', '.join(accelerators) or '(none)'}"
            )
        profiles[p["name"]] = Profile(
            name=p["name"],
            images=tuple(p["images"]),
            sizes=tuple(p["sizes"]),
            display_name=p.get("display_name", p["name"]),
            description=p.get("description", ""),
            accelerator=p.get("accelerator"),
            groups=tuple(p.get("groups", ())),
            default=p.get("default", False),
            kueue=p.get("kueue", False),
            allow_accelerator_nodes=p.get("allow_accelerator_nodes", False),
        )
    defaults = [name for name, p in profiles.items() if p.default]
    if len(defaults) > 1:
        raise CatalogueError(
            f"{source}: profiles {defaults[1]!r}: field default: only one profile may be the "
            f"default (also set on {defaults[0]!r})"
        )
    return Catalogue(images, sizes, accelerators, profiles, source=source)


def _mig_fraction(mig_profile: str) -> float:
    """A MIG slice ``Ng.XXgb`` is N of the 7 compute slices of an A100/H100."""
    return int(mig_profile.split("g.", 1)[0]) / 7


def load_catalogue(path: str | Path) -> Catalogue:
    """Read and validate a catalogue YAML file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CatalogueError(f"{path}: cannot read the catalogue: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CatalogueError(f"{path}: not valid YAML: {e}") from None
    return parse_catalogue(data, source=str(path))
