using System.Net.Sockets;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// The reading end of the migration channel as a VM-state backend: each read fills the buffer (or
/// reaches the end of the stream) before it returns, so the reader gets large chunks instead of
/// whatever QEMU's last 32 KiB write left in the socket. Safe because QEMU only sends: it never waits
/// for vmsnap to say something before sending more.
/// </summary>
internal sealed class ChannelBackend(Socket socket, string? teePath = null) : VmStateBackend
{
    private long _position;

    // A diagnostic copy of every byte received (VMSNAP_LIVE_TEE): what QEMU sent, to set beside what was stored.
    private readonly FileStream? _tee = teePath is null ? null : new FileStream(teePath, FileMode.Create, FileAccess.Write, FileShare.Read, 1 << 20);

    public override int Alignment => 1;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position) =>
        throw new NotSupportedException("the migration channel is read only");

    public override int Read(Span<byte> buffer, long position)
    {
        if (position != _position)
            throw new VmStateException($"the migration channel can only be read sequentially: read at stream offset {position}, expected {_position}");
        int total = 0;
        while (total < buffer.Length)
        {
            int n = socket.Receive(buffer[total..], SocketFlags.None);
            if (n == 0) break;
            total += n;
        }
        _tee?.Write(buffer[..total]);
        _position += total;
        return total;
    }

    protected override void Dispose(bool disposing)
    {
        if (disposing) _tee?.Dispose();
        base.Dispose(disposing);
    }
}
