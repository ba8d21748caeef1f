using System.Runtime.CompilerServices;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;

namespace Vmsnap.Migration;

/// <summary>
/// Typed reads of a migration stream from a <see cref="VmStateReader"/>: each turns a premature end into a
/// <see cref="MigrationStreamException"/> that says what was being read and where.
/// </summary>
// The per-page paths are compiled fully optimized from their first call: a load lasts about a second per GiB, and
// tiering would run much of it in unoptimized code while the JIT competes for the CPU.
internal sealed class StreamInput(VmStateReader reader)
{
    public long Position => reader.Position;

    /// <summary>True when the stream can be read by offset (a file or a VM-state area; not a pipe or socket).</summary>
    public bool CanSeek => reader.CanSeek;

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public byte U8(string what)
    {
        long at = reader.Position;
        try { return reader.GetByte(); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    public ushort Be16(string what)
    {
        long at = reader.Position;
        try { return reader.GetBe16(); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    public uint Be32(string what)
    {
        long at = reader.Position;
        try { return reader.GetBe32(); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public ulong Be64(string what)
    {
        long at = reader.Position;
        try { return reader.GetBe64(); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public void Bytes(Span<byte> buffer, string what)
    {
        long at = reader.Position;
        try { reader.Read(buffer); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public void Skip(long count, string what)
    {
        long at = reader.Position;
        try { reader.Skip(count); }
        catch (VmStateException e) { throw Truncated(what, at, e); }
    }

    /// <summary>A u8 length and that many bytes (section and RAM block id strings), as they are.</summary>
    public byte[] IdBytes(string what)
    {
        byte[] id = new byte[U8(what + "'s length")];
        Bytes(id, what);
        return id;
    }

    public string IdString(string what) => System.Text.Encoding.UTF8.GetString(IdBytes(what));

    /// <summary>Copies up to <paramref name="buffer"/>.Length upcoming bytes without consuming them; returns how many there were.</summary>
    [MethodImpl(MethodImplOptions.AggressiveOptimization)]
    public int Peek(Span<byte> buffer) => reader.Peek(buffer);

    /// <summary>The next byte, left unread; at the end the read says so.</summary>
    public byte PeekByte(string what)
    {
        Span<byte> next = stackalloc byte[1];
        return reader.Peek(next) == 1 ? next[0] : U8(what);
    }

    public void Seek(long position) => reader.Seek(position);

    private static MigrationStreamException Truncated(string what, long at, VmStateException e) =>
        new($"could not read {what}: {e.Message}", at, e);
}
