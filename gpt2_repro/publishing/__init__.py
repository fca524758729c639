"""What a run shares: model cards and uploads to the Hugging Face Hub."""
