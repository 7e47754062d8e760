"""One cohort filter spec rendered as SQL for DuckDB or BigQuery (same filters, same ranking).

A stratum becomes an ordered list of named filter steps over a series-level table called
`series`. Every backend runs the same three queries on it: the series count after each
step (explain mode, and the message when a stratum selects nothing), the series count per
license before the license step, and the selection itself (seeded md5 rank per patient,
then a seeded md5 order over the stratum, then the caps). Literals are inlined, so the SQL
printed by explain mode is exactly the SQL that ran.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Image storage SOP classes per modality; SR, SEG, RTSTRUCT, presentation states, raw data
# and secondary captures never enter a training cohort.
IMAGE_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"),
    "CR": ("1.2.840.10008.5.1.4.1.1.1",),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"),
}


class CohortSpecError(ValueError):
    """A stratum names values (collections, body parts, modalities) the index does not have."""


@dataclass(frozen=True)
class Dialect:
    """The few spellings that differ between DuckDB and BigQuery SQL."""

    name: str

    def literal(self, value: str) -> str:
        if self.name == "bigquery":  # backslash escapes inside '...'
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return "'" + value.replace("'", "''") + "'"

    def md5_hex(self, expr: str) -> str:
        """Lower-case hex md5; DuckDB's md5() and BigQuery's TO_HEX(MD5()) agree byte for byte."""
        return f"TO_HEX(MD5({expr}))" if self.name == "bigquery" else f"md5({expr})"

    def regex_contains(self, expr: str, pattern: str) -> str:
        fn = "REGEXP_CONTAINS" if self.name == "bigquery" else "regexp_matches"
        return f"{fn}({expr}, {self.literal(pattern)})"

    def quote(self, column: str) -> str:
        return f"`{column}`" if self.name == "bigquery" else f'"{column}"'

    def in_list(self, expr: str, values: Iterable[str]) -> str:
        values = list(values)
        if not values:
            return "FALSE"
        return f"{expr} IN ({', '.join(self.literal(v) for v in values)})"


DUCKDB = Dialect("duckdb")
BIGQUERY = Dialect("bigquery")


@dataclass(frozen=True)
class Step:
    """One named filter: the series left after it satisfy this and every earlier predicate."""

    name: str
    predicate: str


def stratum_steps(
    stratum: dict,
    settings: dict,
    human_collections: Sequence[str],
    taken: Sequence[str],
    d: Dialect,
) -> list[Step]:
    """The stratum's filters in the order explain mode reports them; license last."""
    sop_classes = [uid for m in stratum["modalities"] for uid in IMAGE_SOP_CLASSES[m]]
    steps = [
        Step("modality", d.in_list("Modality", stratum["modalities"])),
        Step("image_sop_class", d.in_list("SOPClassUID", sop_classes)),
    ]
    if settings["exclude_derived"]:
        steps.append(Step("not_derived", "analysis_result_id IS NULL"))
    if settings["human_only"]:
        steps.append(Step("human_only", d.in_list("collection_id", human_collections)))
    if stratum["collections"]:
        steps.append(Step("collections", d.in_list("collection_id", stratum["collections"])))
    if stratum["body_parts"]:
        parts = [b.upper() for b in stratum["body_parts"]]
        steps.append(Step("body_parts", d.in_list("UPPER(BodyPartExamined)", parts)))
    instances = f"instanceCount >= {int(stratum['min_instances'])}"
    if stratum["max_instances"] is not None:
        instances += f" AND instanceCount <= {int(stratum['max_instances'])}"
    steps.append(Step("instance_count", instances))
    if settings["exclude_description_regex"]:
        description = d.regex_contains(
            "COALESCE(SeriesDescription, '')", settings["exclude_description_regex"]
        )
        steps.append(Step("not_localizer_description", f"NOT {description}"))
    if taken:
        earlier = ", ".join(d.literal(uid) for uid in taken)
        steps.append(
            Step(
                "not_in_earlier_strata",
                f"SeriesInstanceUID NOT IN (SELECT * FROM UNNEST([{earlier}]))",
            )
        )
    steps.append(Step("license_allow", d.in_list("license_short_name", settings["license_allow"])))
    return steps


def _with(source_sql: str) -> str:
    return f"WITH series AS (\n{source_sql}\n)\n"


def _conjunction(steps: Sequence[Step]) -> str:
    return " AND ".join(f"({s.predicate})" for s in steps) or "TRUE"


def step_counts_sql(source_sql: str, steps: Sequence[Step]) -> str:
    """One row: c0 = all series, cK = series passing steps 1..K (one scan)."""
    columns = ["COUNT(*) AS c0"]
    for k in range(1, len(steps) + 1):
        columns.append(f"SUM(CASE WHEN {_conjunction(steps[:k])} THEN 1 ELSE 0 END) AS c{k}")
    return _with(source_sql) + "SELECT\n  " + ",\n  ".join(columns) + "\nFROM series"


def license_counts_sql(source_sql: str, steps: Sequence[Step]) -> str:
    """Series per license among those passing every step except the license step."""
    before_license = [s for s in steps if s.name != "license_allow"]
    return (
        _with(source_sql) + "SELECT license_short_name AS license, COUNT(*) AS n\n"
        f"FROM series\nWHERE {_conjunction(before_license)}\nGROUP BY license_short_name"
    )


def selection_sql(
    source_sql: str, steps: Sequence[Step], stratum: dict, seed: int, d: Dialect
) -> str:
    """The stratum's SeriesInstanceUID and sample_key, in sample order, after the caps.

    The sample key is md5(seed/stratum/SeriesInstanceUID): seeded rank per patient first,
    then a seeded order over the stratum, so a larger cap (per patient or per stratum) keeps
    every series a smaller cap chose. Only keys travel; rows_sql fetches the full rows of
    all strata in one pass (on BigQuery that also scans the wide columns once, not per
    stratum).
    """
    prefix = d.literal(f"{seed}/{stratum['name']}/")
    key = d.md5_hex(f"CONCAT({prefix}, SeriesInstanceUID)")
    per_patient = stratum["max_series_per_patient"]
    patient_cap = f"WHERE patient_rank <= {int(per_patient)}\n" if per_patient else ""
    cap = stratum["max_series"]
    limit = f"\nLIMIT {int(cap)}" if cap is not None else ""
    return (
        _with(source_sql)
        + "SELECT SeriesInstanceUID, sample_key\nFROM (\n"
        + f"  SELECT SeriesInstanceUID, {key} AS sample_key,\n"
        + "    ROW_NUMBER() OVER (PARTITION BY collection_id, PatientID\n"
        + f"                       ORDER BY {key}) AS patient_rank\n"
        + f"  FROM series\n  WHERE {_conjunction(steps)}\n) AS ranked\n"
        + f"{patient_cap}ORDER BY sample_key, SeriesInstanceUID{limit}"
    )


def rows_sql(source_sql: str, columns: Sequence[str], uids: Sequence[str], d: Dialect) -> str:
    """Every column of the series whose SeriesInstanceUID is in `uids`."""
    select = ", ".join(d.quote(c) for c in columns)
    listed = ", ".join(d.literal(u) for u in uids)
    return (
        _with(source_sql) + f"SELECT {select}\nFROM series\n"
        f"WHERE SeriesInstanceUID IN (SELECT * FROM UNNEST([{listed}]))"
    )


def closest(value: str, valid: Iterable[str], n: int = 5) -> list[str]:
    """The valid values nearest to `value` (difflib, case-insensitive)."""
    by_upper: dict[str, str] = {}
    for v in valid:
        by_upper.setdefault(v.upper(), v)
    return [by_upper[m] for m in difflib.get_close_matches(value.upper(), by_upper, n, 0.5)]


def unknown_values(strata: Sequence[dict], vocabulary: dict[str, set[str]]) -> list[str]:
    """One message per configured value the index does not have, with the closest valid ones.

    `vocabulary` maps "collections" / "body_parts" / "modalities" to the index's distinct
    values (body parts upper case, as the filter compares them). When every value of a key
    is unknown the message says that the stratum selects nothing.
    """
    problems = []
    for stratum in strata:
        for key in ("collections", "body_parts", "modalities"):
            valid = vocabulary[key]
            values = stratum.get(key) or []
            unknown = [v for v in values if (v.upper() if key == "body_parts" else v) not in valid]
            for value in unknown:
                near = closest(value, valid)
                hint = f"closest: {', '.join(near)}" if near else "no close match in the index"
                where = f"cohort.strata[{stratum['name']}]"
                lead = f"{where} selects nothing: " if len(unknown) == len(values) else ""
                problems.append(f"{lead}{where}.{key}: {value!r} is not in the IDC index ({hint})")
    return problems
