"""Stage logic as plain functions, with thin Prefect @task wrappers beside them."""
