-- Run once by the postgres image on an empty data volume (POSTGRES_DB already created
-- mlflow): the Prefect server keeps its state in a database of its own.
CREATE DATABASE prefect;
