using Vmsnap.Qcow2;
using Vmsnap.VmState;
using Vmsnap.VmState.LowLevel;
using Vmsnap.Qcow2.LowLevel;

namespace Vmsnap.Live;

/// <summary>
/// The VM-state writer's backend for a live save: positional writes into the detached VM-state area
/// (<see cref="DetachedVmStateArea"/>, which owns the file, its preallocation and its syncs).
/// </summary>
internal sealed class DetachedAreaBackend(DetachedVmStateArea area) : VmStateBackend
{
    public override bool PrefersBufferedMode => true;

    public override int Alignment => area.Alignment;

    public override bool IsPositional => true;

    public override void WriteVectored(ReadOnlySpan<ReadOnlyMemory<byte>> segments, long position)
    {
        foreach (ReadOnlyMemory<byte> s in segments)
        {
            area.Write(s.Span, position);
            position += s.Length;
        }
    }

    public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long position, CancellationToken cancellationToken = default) =>
        area.WriteAsync(buffer, position, cancellationToken);

    public override int Read(Span<byte> buffer, long position) => area.Read(buffer, position);

    public override void Flush() => area.Flush();
}
