"""The shared production stack: PostgreSQL, an S3 object store, MLflow's and Prefect's servers, a worker.

``vggflow stack up`` starts, in one folder (``stack.dir``) and bound to 127.0.0.1 only:

- ``postgres``: Debian's PostgreSQL (``initdb`` into the folder, password authentication),
  holding MLflow's backend store, Prefect's database and the promotion lock;
- ``s3``: ``rclone serve s3`` over a local folder (a real S3 server), holding MLflow's artifacts,
  the DVC remote and feature shards;
- ``mlflow``: the tracking server on PostgreSQL, serving artifacts from the bucket (clients need
  no S3 credentials for MLflow);
- ``prefect``: Prefect's server on PostgreSQL, a process work pool and a worker (``worker``);
  the project's ``prefect.yaml`` deployments are deployed to it;
- ``dask`` (``stack.dask_workers`` > 0): a Dask scheduler and single-threaded workers.

One module per service (``postgres``, ``objectstore``, ``mlflow_server``, ``prefect_server``,
``dask_cluster``), the folder's state and credentials (``folder``), what clients need
(``client``) and the order of it all (``orchestrate``). Every service is a
:class:`vggflow.processes.SupervisedProcess` in its own process group that outlives the command
starting it; ``vggflow stack down`` stops the groups and then whatever still carries the
stack's environment marker. Credentials are generated per stack, kept in files of mode 0600 and
passed to servers through their environment (never a command line, never printed or logged).
"""
