"""The machinery every PEFT method shares: configs, the method table, the adapter-holder
contract, targeting, PeftModel and files. Its low modules (config, base, targeting, names,
method) import no method; registry, peft_model, adapters and saving sit above the methods."""
