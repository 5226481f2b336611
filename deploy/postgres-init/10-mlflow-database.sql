-- Run once by the postgres image when it initialises an empty data volume: MLflow's tracking
-- and registry tables live in their own database next to Dagster's, owned by the same role.
CREATE DATABASE mlflow;
