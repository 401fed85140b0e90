"""The learner: networks (model.py), optimisers and schedules (optim.py), the engine (engine.py) and the
methods it trains (methods/)."""
