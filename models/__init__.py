"""Everything that runs a neural network: loading, likelihood scoring, generation, scorers, embeddings.

Plain Python + torch: nothing here imports Prefect or MLflow.
"""
