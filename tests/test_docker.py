"""docker/docker-compose.yml against the Neo4j 5 image's rules (no Docker engine runs here, so the file is read).

The image's entrypoint (github.com/neo4j/docker-neo4j, docker-image-src/5/coredb/docker-entrypoint.sh) turns every
NEO4J_* variable except its own control variables into a neo4j.conf line, and Neo4j 5 validates settings strictly
by default: an unknown name stops the server. So every such variable must name a real setting.
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import yaml

COMPOSE = Path(__file__).resolve().parents[1] / "docker" / "docker-compose.yml"

# Settings of the Neo4j 5 operations manual, "Configuration settings"
# (https://neo4j.com/docs/operations-manual/5/configuration/configuration-settings/): the memory, JVM, listening
# and directory settings a compose file for this project could reasonably set. A name outside it fails the test.
MANUAL_SETTINGS = {
    "server.memory.heap.initial_size", "server.memory.heap.max_size", "server.memory.pagecache.size",
    "server.memory.pagecache.directio", "server.memory.pagecache.scan.prefetchers", "server.memory.off_heap.transaction_max_size",
    "server.memory.query_cache.sharing_enabled", "db.memory.transaction.max", "db.memory.transaction.total.max",
    "dbms.memory.transaction.total.max", "server.jvm.additional", "server.default_listen_address",
    "server.default_advertised_address", "server.bolt.listen_address", "server.bolt.advertised_address",
    "server.http.listen_address", "server.http.advertised_address", "server.directories.import", "server.directories.data",
    "server.directories.logs", "server.directories.plugins", "server.config.strict_validation.enabled",
    "dbms.security.auth_minimum_password_length", "db.tx_log.rotation.retention_policy", "db.logs.query.enabled",
}
# The entrypoint's own variables (its `not_configs` list): read by the image, never written to neo4j.conf.
IMAGE_CONTROL = {"NEO4J_ACCEPT_LICENSE_AGREEMENT", "NEO4J_AUTH", "NEO4J_AUTH_PATH", "NEO4J_DEBUG", "NEO4J_EDITION",
                 "NEO4J_HOME", "NEO4J_PLUGINS", "NEO4J_SHA256", "NEO4J_TARBALL"}


def setting_name(variable: str) -> str:
    """The entrypoint's conversion: drop NEO4J_, `_` -> `.`, then `..` -> `_` (so `__` stands for `_`)."""
    return variable.removeprefix("NEO4J_").replace("_", ".").replace("..", "_")


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def neo4j_service() -> dict:
    return next(s for s in compose()["services"].values() if str(s.get("image", "")).startswith("neo4j:5"))


def test_every_neo4j_variable_is_a_setting_or_read_by_the_image():
    env = neo4j_service()["environment"]
    assert "NEO4J_AUTH" in env
    for variable in env:
        assert variable.startswith("NEO4J_"), variable  # nothing else is passed to the server
        assert variable in IMAGE_CONTROL or setting_name(variable) in MANUAL_SETTINGS, f"{variable} -> {setting_name(variable)}"


def test_the_conversion_matches_the_manuals_examples():
    """Examples from the manual's Docker pages, so `setting_name` cannot drift from the image's rule."""
    assert setting_name("NEO4J_server_memory_heap_max__size") == "server.memory.heap.max_size"
    assert setting_name("NEO4J_db_tx__log_rotation_retention__policy") == "db.tx_log.rotation.retention_policy"
    assert setting_name("NEO4J_PASSWORD") == "PASSWORD"  # what the old file passed: no setting, a crash loop


def test_memory_is_fixed_and_sized():
    env = {setting_name(k): str(v) for k, v in neo4j_service()["environment"].items() if k not in IMAGE_CONTROL}

    def gib(size: str) -> float:
        number, unit = re.fullmatch(r"(\d+)([mMgG])", size).groups()
        return int(number) / (1024 if unit in "mM" else 1)

    assert env["server.memory.heap.initial_size"] == env["server.memory.heap.max_size"]
    assert gib(env["server.memory.pagecache.size"]) >= 3.3  # the ~30M-relationship store estimated in the file
    assert "-XX:+ExitOnOutOfMemoryError" in env["server.jvm.additional"].split()


def test_no_password_in_the_servers_settings_or_healthcheck():
    service = neo4j_service()
    for variable, value in service["environment"].items():
        assert variable == "NEO4J_AUTH" or "PASSWORD" not in str(value), variable
    check = " ".join(service["healthcheck"]["test"])
    assert "PASSWORD" not in check and "-p" not in check.split() and "cypher-shell" not in check


def test_the_app_reaches_the_server_by_its_service_name():
    services = compose()["services"]
    name = next(n for n, s in services.items() if s is not None and str(s.get("image", "")).startswith("neo4j:5"))
    app = services["app"]
    uri = urlparse(app["environment"]["CIRCUIT_CATALOG_STORE"])
    assert (uri.scheme, uri.hostname, uri.port) == ("bolt", name, 7687)  # the container's Bolt port, not the host's
    assert app["depends_on"][name]["condition"] == "service_healthy"
    assert app["environment"]["NEO4J_PASSWORD"] == services[name]["environment"]["NEO4J_AUTH"].split("/", 1)[1]


def test_the_cli_takes_its_store_from_the_compose_variable(tmp_path):
    """CIRCUIT_CATALOG_STORE stands in for --store: here a Bolt address nothing listens on, named in the error."""
    import socket

    from click.testing import CliRunner

    from circuit_catalog.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(main, ["upstream", "L1/1", "--catalog", str(tmp_path)],
                                env={"CIRCUIT_CATALOG_STORE": f"bolt://127.0.0.1:{port}"})
    assert result.exit_code == 1 and f"cannot reach bolt://127.0.0.1:{port}" in result.output
