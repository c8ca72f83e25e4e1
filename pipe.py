import socket,time
def go(label,data,split=None):
    s=socket.create_connection(("127.0.0.1",18080)); s.settimeout(3); t0=time.time()
    if split:
        for p in data.split(b"||"):
            s.sendall(p); time.sleep(0.2)
    else: s.sendall(data.replace(b"||",b""))
    out=b""
    try:
        while True:
            d=s.recv(65536)
            if not d: break
            out+=d
    except Exception as e: out+=b"<"+repr(e).encode()+b">"
    st=[l for l in out.decode('latin1').split("\r\n") if l.startswith("HTTP/") or l.startswith("<")]
    print(label, st, "%.2f"%(time.time()-t0))
g=b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
c=b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
go("sequential", g+b"||"+g+b"||"+c, split=True)
go("pipelined 3", g+g+c)
