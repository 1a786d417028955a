from conftest import final_status

TEMPLATES = '''
[hello]
[[hello.steps]]
log = "hi"
'''


def test_in_process(make_app):
    client = make_app(TEMPLATES)
    token = client.get("/api/jobs/trigger", {"template": "hello"}).text
    assert final_status(client, token) == "Succeeded"
    assert client.get("/api/jobs/logs", {"token": token}).text == "INFO: hi\n"


def test_real_server(start_server):
    server = start_server(TEMPLATES)
    token = server.trigger("hello")
    assert server.final_status(token) == "Succeeded"
    assert server.stop() == 0
