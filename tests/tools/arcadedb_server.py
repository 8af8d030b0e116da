"""Run ArcadeDB with its Bolt plugin on 127.0.0.1 until stdin closes: the Bolt test server's own process.

Usage: python arcadedb_server.py ROOT PASSWORD BOLT_PORT HTTP_PORT. Prints "ready" once both ports listen.
Its JVM lives in this process, not in pytest's: a JVM shutting down beside LadybugDB's native threads
crashed the test process at exit now and then.
"""

import os
import sys

from arcadedb_embedded.server import ArcadeDBServer


def main() -> None:
    root, password, bolt, http = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.chdir(root)  # the server writes ./log relative to the working directory
    server = ArcadeDBServer(
        root_path=os.path.join(root, "databases"), root_password=password,
        config={"host": "127.0.0.1", "http_port": http, "bolt_port": bolt, "bolt_host": "127.0.0.1",
                "server_plugins": "Bolt:com.arcadedb.bolt.BoltProtocolPlugin"},
        jvm_kwargs={"heap_size": "512m"},
    )
    server.start()
    print("ready", flush=True)
    sys.stdin.read()  # until the test session closes our stdin
    server.stop()


if __name__ == "__main__":
    main()
