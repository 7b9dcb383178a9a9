"""The pages of Snakemake's HTML report that the other stages do not write: each table as an
HTML page, and the configuration this run used."""

import json
import logging
from pathlib import Path

import yaml

from quari.runlog import log_to
from quari.store import atomic_write_text
from quari.reporting.html import markdown_page

log = logging.getLogger("quari.report")


def main(smk):
    for name, page in smk.output.items():
        if name.startswith("table"):
            markdown = Path(smk.input[name]).read_text()
            atomic_write_text(page, markdown_page(markdown, markdown.splitlines()[0].lstrip("# ")))
    plain = json.loads(json.dumps(dict(smk.params.config), default=str))  # plain types for YAML
    atomic_write_text(smk.output.configuration, yaml.safe_dump(plain, sort_keys=False))
    log.info("wrote %d report pages", len(smk.output))


with log_to(snakemake.log[0]):  # noqa: F821
    main(snakemake)  # noqa: F821
