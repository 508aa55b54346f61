"""Great Expectations' own Data Docs site for one run's validations: an optional extra (`evaluate --data-docs`).

The run's report is `report.html`, self-contained so it opens on a hospital network without internet. GX's Data
Docs pages are not: they load their styles and scripts (Bootstrap, jQuery, Font Awesome, Vega...) from public CDNs,
so without internet they open as unstyled text. They are written only on request, into `OUT/gx-data-docs/`, for
readers who know GX's views.

Nothing here runs unless asked: `validate_batch` stays as it is (it keeps no GX result objects, and the evaluate
benchmark's GX share is tight). Instead the batches the run validated are validated once more here, in an ephemeral
GX context of their own, with GX's SUMMARY result format (a sample of failing values per expectation, which is what
Data Docs shows; the run's COMPLETE lists of failing rows would make pages of millions of ids). The frames are
prepared exactly as `validate_batch` prepares them, so the pages show the same successes and failure counts as the
report. A context of its own keeps the shared validation context free of sites and stored results, and a second
run in the same process from listing the first run's pages.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from leukofhir.errors import ConfigError
from leukofhir.evaluate.validate import ID_COLUMN, new_context, prepare_frame

DATA_DOCS_DIR = "gx-data-docs"
SITE_NAME = "leukofhir"

log = logging.getLogger(__name__)


def write_data_docs(site_dir: Path | str, batches: list[tuple[str, pd.DataFrame]], parameters: dict) -> Path:
    """Validate each (suite, rows) batch in a fresh ephemeral GX context whose one Data Docs site is a local
    folder, and build that site: `site_dir/index.html`, one page per validation and one per suite.

    `rows` are the frames given to `validate_batch` (with `row_id`), `parameters` the same `suite_parameters`.
    GX's site builder lists only the validations of this context in the index and deletes the pages of earlier
    runs written to the same folder. Returns the path of index.html."""
    site_dir = Path(site_dir).resolve()
    context = _context(site_dir)
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    # One run id for all the run's validations (the index groups them as one run); the name is a path part.
    run_id = RunIdentifier(run_name="leukofhir-evaluate", run_time=pd.Timestamp.now(tz="UTC").to_pydatetime())
    source = context.data_sources.add_pandas("leukofhir")
    for suite, rows in batches:
        if suite not in ID_COLUMN:
            raise ConfigError(f"unknown expectation suite {suite!r}; known: {', '.join(ID_COLUMN)}")
        id_column = ID_COLUMN[suite]
        frame, _ = prepare_frame(suite, rows, parameters)
        batch_definition = source.add_dataframe_asset(suite).add_batch_definition_whole_dataframe(suite)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=suite, data=batch_definition, suite=context.suites.get(suite))
        )
        # ValidationDefinition.run stores its result in the context's (in-memory) validation results store,
        # which is where the site builder reads validations from.
        definition.run(
            batch_parameters={"dataframe": frame},
            expectation_parameters=parameters,
            result_format={
                "result_format": "SUMMARY",
                "unexpected_index_column_names": [id_column],
                "return_unexpected_index_query": False,
            },
            run_id=run_id,
        )
    context.build_data_docs(site_names=[SITE_NAME])
    index = site_dir / "index.html"
    log.info("GX Data Docs written to %s (their pages load styles from public CDNs)", index)
    return index


def _context(site_dir: Path):
    """A context of its own (see validate.new_context) with one local-folder Data Docs site."""
    context = new_context()
    context.add_data_docs_site(
        site_name=SITE_NAME,
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(site_dir)},
        },
    )
    return context
