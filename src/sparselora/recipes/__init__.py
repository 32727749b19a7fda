"""How we fine-tune with the engine: run config, data, model loading, training, evaluation,
export, offline assets and the demo."""
