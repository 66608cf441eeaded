from plugtron.cli import run

run()
