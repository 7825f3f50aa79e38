"""The model half's pure parts: catalogs, prices and costs.

Nothing here fetches or reads a clock: a catalog is parsed from a document the
caller got (``parse_catalog``), and costs are computed from it and from an
answer's ``usage`` (``cost``). Like the core, it depends on attrs only.
"""

from .catalog import PRICE_FIELDS, Catalog, CatalogError, ModelInfo, Pricing, parse_catalog
from .cost import (
    Estimate,
    Price,
    estimate,
    estimate_tokens,
    price_answer,
    pricer,
    spend,
    usage_cost,
)

__all__ = [
    "PRICE_FIELDS",
    "Catalog",
    "CatalogError",
    "Estimate",
    "ModelInfo",
    "Price",
    "Pricing",
    "estimate",
    "estimate_tokens",
    "parse_catalog",
    "price_answer",
    "pricer",
    "spend",
    "usage_cost",
]
