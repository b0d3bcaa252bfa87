//! The transformer step (Gemma 3, Llama), generic over a backend.
