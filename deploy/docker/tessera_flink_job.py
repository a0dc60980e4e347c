"""Entry script of Tessera's PyFlink job, for `flink run --python` and the operator's PythonDriver.

Flink runs a Python *file* (`-py`); this one hands its arguments to the `tessera` CLI, so
`flink run ... -py tessera_flink_job.py worker --engine flink` runs
`tessera worker --engine flink` inside the Flink client, which then submits the job to
the cluster it was started against. Installed at /opt/flink/usrlib/ by Dockerfile.flink.
"""

from pipelines.cli import main

if __name__ == "__main__":
    main()
