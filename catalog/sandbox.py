"""The SQL gate: one read-only query over catalog tables, or a clear refusal.

This is the first of two walls. The second is the connection itself (`Catalog.open` in read-only
mode turns DuckDB's external access off and locks its configuration), so a query that got past
this check still could not touch a file.

A query passes when it is a single SELECT (or WITH, UNION, ...), contains no statement inside it
(a DELETE in a CTE, SELECT ... INTO), reads only catalog tables and its own CTEs, and calls only
functions in ALLOWED_FUNCTIONS. Everything else is refused by name.
"""

from __future__ import annotations

import re

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ParseError, TokenError

from catalog.errors import SaecatError
from catalog.macros import MACRO_NAMES
from catalog.schema import QUERYABLE_TABLES

# The functions user SQL may call, by the name DuckDB runs (see _function_name). Deliberately
# absent, among others: file and catalog readers (read_*, glob, query, duckdb_*, pragma_*),
# session state (getenv, current_setting, getvariable, nextval, currval, setval, setseed), side
# effects and stalls (write_log, sleep_ms, pg_sleep), and SQL text execution (json_execute_*).
ALLOWED_FUNCTIONS: frozenset[str] = frozenset(" ".join((
    # syntax that sqlglot models as functions
    "cast try_cast extract exists columns coalesce ifnull",
    # aggregates
    "any_value approx_count_distinct approx_quantile arbitrary arg_max arg_max_null arg_min arg_min_null "
    "argmax argmin array_agg avg bit_and bit_or bit_xor bool_and bool_or corr count count_if count_star "
    "countif covar_pop covar_samp entropy favg first fsum geomean geometric_mean group_concat histogram "
    "kahan_sum kurtosis kurtosis_pop last list listagg mad max max_by mean median min min_by mode product "
    "quantile quantile_cont quantile_disc regr_avgx regr_avgy regr_count regr_intercept regr_r2 regr_slope "
    "regr_sxx regr_sxy regr_syy reservoir_quantile sem skewness stddev stddev_pop stddev_samp string_agg "
    "sum sumkahan var_pop var_samp variance weighted_avg wavg",
    # window functions
    "cume_dist dense_rank first_value lag last_value lead nth_value ntile percent_rank rank row_number",
    # math
    "abs acos acosh add asin asinh atan atan2 atanh bit_count cbrt ceil ceiling cos cosh cot degrees "
    "divide even exp factorial fdiv floor fmod gamma gcd greatest greatest_common_divisor isfinite isinf "
    "isnan lcm least least_common_multiple lgamma ln log log10 log2 mod multiply nextafter pi pow power "
    "radians random round round_even roundbankers sign signbit sin sinh sqrt subtract tan tanh trunc xor",
    # strings
    "ascii base64 bin bit_length chr concat concat_ws contains damerau_levenshtein editdist3 ends_with "
    "format from_base64 from_hex hamming hash hex instr jaccard jaro_similarity jaro_winkler_similarity "
    "lcase left len length levenshtein like_escape lower lpad ltrim md5 mismatches nfc_normalize "
    "octet_length ord position prefix printf repeat replace reverse right rpad rtrim sha1 sha256 "
    "split_part starts_with str_split string_split string_to_array strip_accents strlen strpos substr "
    "substring suffix to_base64 to_hex translate trim ucase unhex unicode upper",
    # regular expressions
    "regexp_escape regexp_extract regexp_extract_all regexp_full_match regexp_matches regexp_replace "
    "regexp_split_to_array str_split_regex string_split_regex",
    # dates and times
    "age century current_date date_add date_diff date_part date_sub date_trunc datediff datepart datesub "
    "datetrunc day dayname dayofmonth dayofweek dayofyear decade epoch epoch_ms epoch_ns epoch_us era hour "
    "isodow isoyear julian last_day make_date make_time make_timestamp microsecond millennium millisecond "
    "minute month monthname nanosecond now quarter second strftime strptime time_bucket timezone "
    "timezone_hour timezone_minute to_centuries to_days to_decades to_hours to_microseconds to_millennia "
    "to_milliseconds to_minutes to_months to_quarters to_seconds to_timestamp to_weeks to_years today "
    "try_strptime week weekday weekofyear year yearweek",
    # JSON extraction
    "json json_array_length json_contains json_exists json_extract json_extract_path json_extract_path_text "
    "json_extract_string json_keys json_structure json_type json_valid json_value",
    # lists and fixed-size arrays, vector similarities included
    "apply array_aggr array_aggregate array_append array_apply array_cat array_concat array_contains "
    "array_cosine_distance array_cosine_similarity array_cross_product array_distance array_distinct "
    "array_dot_product array_extract array_filter array_grade_up array_has array_has_all array_has_any "
    "array_indexof array_inner_product array_intersect array_length array_negative_dot_product "
    "array_negative_inner_product array_pop_back array_pop_front array_position array_prepend array_push_back "
    "array_push_front array_reduce array_resize array_reverse array_reverse_sort array_select array_slice "
    "array_sort array_to_string array_transform array_unique array_value array_where array_zip cardinality "
    "filter flatten generate_series generate_subscripts list_aggr list_aggregate list_any_value list_append "
    "list_apply list_approx_count_distinct list_avg list_bool_and list_bool_or list_cat list_concat "
    "list_contains list_cosine_distance list_cosine_similarity list_count list_distance list_distinct "
    "list_dot_product list_element list_entropy list_extract list_filter list_first list_grade_up list_has "
    "list_has_all list_has_any list_histogram list_indexof list_inner_product list_intersect list_kurtosis "
    "list_last list_mad list_max list_median list_min list_mode list_negative_dot_product "
    "list_negative_inner_product list_pack list_position list_prepend list_product list_reduce list_resize "
    "list_reverse list_reverse_sort list_select list_sem list_skewness list_slice list_sort list_stddev_pop "
    "list_stddev_samp list_string_agg list_sum list_transform list_unique list_value list_var_pop "
    "list_var_samp list_where list_zip range reduce unnest",
    # structs, maps, NULL handling, types
    "element_at map map_concat map_contains map_entries map_extract map_extract_value map_from_entries "
    "map_keys map_values nullif row struct_extract struct_insert struct_pack typeof",
    # saecat's own macros
    *MACRO_NAMES,
)).split())

# Statements that can hide inside a query: data-modifying CTEs, SELECT ... INTO.
_NESTED_STATEMENTS = (exp.DML, exp.DDL, exp.Into, exp.Command)

_CALL = re.compile(r"([A-Za-z_]\w*)\s*\(")


def _function_name(func: exp.Func) -> str | None:
    """The function DuckDB runs for this call, lower case.

    sqlglot parses the functions it knows into typed expressions (string_agg -> GroupConcat) and
    keeps the others by the name written (Anonymous), which DuckDB then runs as is. A typed one is
    named by how it is written for DuckDB; None where that is syntax rather than a call (CASE,
    `->`, `[...]`, CURRENT_DATE): syntax calls nothing, and its arguments are checked on their own.
    """
    if isinstance(func, exp.Anonymous):
        return func.name.lower()
    call = _CALL.match(func.sql(dialect="duckdb"))
    return call.group(1).lower() if call else None


def _keyword(statement: exp.Expression) -> str:
    """The word a statement starts with, for refusals: DELETE, COPY, PRAGMA, ..."""
    return statement.sql(dialect="duckdb").split(maxsplit=1)[0].upper()


def _is_cte(table: exp.Table) -> bool:
    """Whether a WITH clause around this reference defines its name (a CTE is seen only in its scope)."""
    name = table.name.lower()
    node = table.parent
    while node is not None:
        if isinstance(node, exp.Query) and any(cte.alias_or_name.lower() == name for cte in node.ctes):
            return True
        node = node.parent
    return False


def _parse(sql: str, dialect: str | None) -> exp.Expression:
    try:
        read = Dialect.get_or_raise(dialect or "duckdb")
    except ValueError as err:
        raise SaecatError(f"unknown SQL dialect {dialect!r}") from err
    try:
        statements = [s for s in sqlglot.parse(sql, read=read) if s is not None]
    except ParseError as err:
        first = err.errors[0] if err.errors else {}
        where = f" at line {first.get('line')}, column {first.get('col')}" if first else ""
        raise SaecatError(f"malformed SQL{where}: {first.get('description', err)}") from err
    except TokenError as err:  # an unclosed quote, a stray $: no tokens to parse
        raise SaecatError(f"malformed SQL: {err}") from err
    if len(statements) != 1:
        raise SaecatError(f"exactly one SQL statement is allowed, got {len(statements)}")
    return statements[0]


def check_query(sql: str, *, dialect: str | None = None, max_rows: int | None = None) -> str:
    """Validate `sql` and return it as DuckDB SQL, wrapped in a row limit when one is given."""
    tree = _parse(sql, dialect)
    if not isinstance(tree, exp.Query):
        raise SaecatError(f"only SELECT queries are allowed, not {_keyword(tree)}")
    nested = tree.find(*_NESTED_STATEMENTS)
    if nested is not None:
        raise SaecatError(f"only SELECT queries are allowed, not {_keyword(nested)} inside one")

    for table in tree.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise SaecatError(f"table functions are not allowed: {table.this.sql(dialect='duckdb')}")
        if table.args.get("db") or table.args.get("catalog"):
            raise SaecatError(f"only catalog tables can be read, not {table.sql(dialect='duckdb')}")
        if table.name.lower() not in QUERYABLE_TABLES and not _is_cte(table):
            raise SaecatError(f"unknown table {table.name!r}; the catalog has {', '.join(QUERYABLE_TABLES)}")
    for func in tree.find_all(exp.Func):
        name = _function_name(func)
        if name is not None and name not in ALLOWED_FUNCTIONS:
            raise SaecatError(f"function {name}() is not allowed in catalog queries")

    out = tree.sql(dialect="duckdb")
    if max_rows is not None:
        out = f"SELECT * FROM ({out}) AS _q LIMIT {int(max_rows)}"
    return out
