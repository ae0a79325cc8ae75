-- One PostgreSQL, two databases: Prefect's orchestration state and MLflow's tracking store.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
